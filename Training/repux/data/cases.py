"""Curated-case datasets: find the image/label pairs of a training folder and check them.

Two layouts are read:

- MSD (Medical Segmentation Decathlon): ``dataset.json`` whose ``training`` list holds
  ``{"image": ..., "label": ...}`` paths relative to the folder (``./imagesTr/x.nii.gz``).
- nnU-Net, used when there is no ``dataset.json``: ``imagesTr/<case>_0000.nii.gz`` with
  ``labelsTr/<case>.nii.gz``; plain matching names (``imagesTr/<case>.nrrd`` with
  ``labelsTr/<case>.nrrd``) work too.

:func:`check_cases` reads every case (one at a time, so memory stays that of one case) and
reports every problem of every case at once, before a training run can trip over one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repux.errors import InputError
from repux.imageio import VOLUME_SUFFIXES, Volume, VolumeError, read_volume, volume_suffix
from repux.progress import Progress

#: Name of the MSD-style manifest inside a dataset folder.
MANIFEST = "dataset.json"

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_MAX_LISTED = 10  # values or files named per problem before "and N more"


class CaseError(InputError):
    """A dataset folder or case that cannot be used; the message names every bad file and value."""


@dataclass(frozen=True)
class Case:
    """One training case: an image and its label volume."""

    case_id: str
    image: Path
    label: Path


@dataclass
class CaseSummary:
    """What :func:`check_cases` found in a set of good cases.

    Attributes:
        count: number of cases.
        shapes, spacings: per case (voxels and mm along i, j, k), in the order checked.
        label_voxels: label value -> voxels with that value over all cases.
        cases_with_label: label value -> number of cases containing it.
        missing_labels: allowed values that no case contains (training cannot learn them).
    """

    count: int
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    spacings: list[tuple[float, float, float]] = field(default_factory=list)
    label_voxels: dict[int, int] = field(default_factory=dict)
    cases_with_label: dict[int, int] = field(default_factory=dict)
    missing_labels: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        spacing = np.array(self.spacings)
        lines = [
            f"{self.count} cases; spacing {spacing.min():.3g}-{spacing.max():.3g} mm; "
            f"largest {max(self.shapes, key=np.prod)} voxels"
        ]
        for value in sorted(self.label_voxels):
            lines.append(f"  label {value}: in {self.cases_with_label[value]} cases, {self.label_voxels[value]} voxels")
        if self.missing_labels:
            lines.append(f"  labels in no case: {self.missing_labels}")
        return "\n".join(lines)


def _listed(items: Sequence, limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _stem(path: Path) -> str:
    suffix = volume_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _raise(header: str, problems: list[str]) -> None:
    if problems:
        raise CaseError(header + "\n" + "\n".join(f"  {p}" for p in problems))


def load_cases(folder: str | os.PathLike) -> list[Case]:
    """The cases of a dataset folder (MSD ``dataset.json`` or nnU-Net layout), sorted by id.

    Raises:
        CaseError: the folder is missing; the manifest is not valid JSON or lacks a
            ``training`` list; entries point to missing files; images without labels (or
            labels without images); duplicate case ids. All such problems in one message.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "no such folder"
        raise CaseError(f"{folder}: {what}; expected a dataset folder with {MANIFEST} or imagesTr/ and labelsTr/")
    manifest = folder / MANIFEST
    cases = _from_manifest(manifest) if manifest.exists() else _from_layout(folder)
    return sorted(cases, key=lambda c: c.case_id)


def _from_manifest(manifest: Path) -> list[Case]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        where = f"at line {error.lineno}, column {error.colno}"
        raise CaseError(f"{manifest}: not valid JSON ({error.msg} {where})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CaseError(f"{manifest}: cannot be read ({error})") from None
    training = data.get("training") if isinstance(data, dict) else None
    if not isinstance(training, list) or not training:
        found = {type(None): "has no 'training' list", list: "has an empty 'training' list"}.get(
            type(training), f"has 'training' as a {type(training).__name__}"
        )
        raise CaseError(
            f"{manifest}: {found}; expected 'training': a list of {{\"image\": PATH, \"label\": PATH}} "
            "entries with paths relative to the folder"
        )
    problems, cases, seen = [], [], {}
    for index, entry in enumerate(training):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("image", "label"))):
            problems.append(f"training entry {index} is {entry!r}; expected {{\"image\": PATH, \"label\": PATH}}")
            continue
        paths = {}
        for key in ("image", "label"):
            path = manifest.parent / entry[key]  # an absolute entry stays absolute
            if not path.exists():
                problems.append(f"training entry {index} {key} {entry[key]!r}: no such file ({path})")
            elif path.is_file() and not volume_suffix(path):
                problems.append(
                    f"training entry {index} {key} {entry[key]!r}: not a volume file; "
                    f"expected {', '.join(VOLUME_SUFFIXES)}"
                )
            paths[key] = path
        case_id = _case_id(paths["image"])
        if case_id in seen:
            problems.append(f"training entry {index}: case {case_id!r} is also entry {seen[case_id]}")
        seen[case_id] = index
        cases.append(Case(case_id, paths["image"], paths["label"]))
    _raise(f"{manifest}: {len(problems)} problem(s) in the training list:", problems)
    return cases


def _case_id(image: Path) -> str:
    stem = _stem(image)
    match = _CHANNEL.match(stem)
    return match["case"] if match and match["channel"] == "0000" else stem


def _volumes(folder: Path) -> list[Path]:
    # Hidden files are skipped: they include half-written temporaries of atomic writes.
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file() and volume_suffix(p))


def _from_layout(folder: Path) -> list[Case]:
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    missing = [d.name + "/" for d in (images_dir, labels_dir) if not d.is_dir()]
    if missing:
        raise CaseError(
            f"{folder}: has no {MANIFEST} and no {' or '.join(missing)}; expected a {MANIFEST} (MSD) "
            "or imagesTr/<case>_0000.nii.gz with labelsTr/<case>.nii.gz (nnU-Net)"
        )
    problems = []
    images: dict[str, Path] = {}
    for path in _volumes(images_dir):
        stem = _stem(path)
        match = _CHANNEL.match(stem)
        if match and match["channel"] != "0000":
            problems.append(f"{path}: channel {match['channel']}; only single-channel CT (_0000) is supported")
            continue
        case_id = match["case"] if match else stem
        if case_id in images:
            problems.append(f"{path}: case {case_id!r} also has image {images[case_id]}")
        images[case_id] = path
    labels: dict[str, Path] = {}
    for path in _volumes(labels_dir):
        case_id = _stem(path)
        if case_id in labels:
            problems.append(f"{path}: case {case_id!r} also has label {labels[case_id]}")
        labels[case_id] = path
    if not images:
        problems.append(f"{images_dir}: holds no images ({', '.join(VOLUME_SUFFIXES)})")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        problems.append(f"{labels_dir}: no label for {_listed([images[c].name for c in unlabelled])}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        problems.append(f"{images_dir}: no image for {_listed([labels[c].name for c in orphans])}")
    _raise(f"{folder}: {len(problems)} problem(s) in the imagesTr/labelsTr layout:", problems)
    return [Case(case_id, images[case_id], labels[case_id]) for case_id in images]


def _describe_values(values: Sequence[int]) -> str:
    values = sorted(values)
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(str(v) for v in values)


def _label_counts(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an integer array and their counts (bincount when the range is small)."""
    low, high = int(array.min()), int(array.max())
    if high - low < 1 << 16:
        counts = np.bincount((array.ravel() - low).astype(np.intp, copy=False), minlength=high - low + 1)
        values = np.nonzero(counts)[0]
        return values + low, counts[values]
    return np.unique(array, return_counts=True)


def _geometry_mismatch(image: Volume, label: Volume) -> str:
    parts = []
    for name, a, b in (
        ("shape", image.shape, label.shape),
        ("spacing", tuple(round(float(s), 4) for s in image.spacing), tuple(round(float(s), 4) for s in label.spacing)),
        ("origin", tuple(round(float(s), 3) for s in image.origin), tuple(round(float(s), 3) for s in label.origin)),
        ("direction", np.round(image.direction, 4).tolist(), np.round(label.direction, 4).tolist()),
    ):
        if name == "shape" and a != b or name != "shape" and not np.allclose(a, b, atol=1e-4):
            parts.append(f"{name} {b} vs image {a}")
    if not parts:  # same within rounding, different within same_geometry's tolerance
        parts.append(f"origin {label.origin} vs image {image.origin}")
    return "; ".join(parts)


def _check_case(case: Case, allowed: set[int], summary: CaseSummary) -> list[str]:
    issues = []
    volumes = {}
    for key in ("image", "label"):
        try:
            volumes[key] = read_volume(getattr(case, key))
        except VolumeError as error:
            issues.append(str(error))
    if len(volumes) < 2:
        return issues
    image, label = volumes["image"], volumes["label"]
    if not image.same_geometry(label):
        issues.append(
            f"label {case.label} does not match image {case.image}: {_geometry_mismatch(image, label)}; "
            "expected the same voxel grid"
        )
    array = label.array
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            odd = np.unique(array[~whole])
            odd_values = _listed(odd.tolist())
            return issues + [f"{case.label}: label values are not whole numbers ({odd_values}); expected integers"]
        array = array.astype(np.int64)
    elif array.dtype.kind not in "uib":
        return issues + [f"{case.label}: label voxels are {array.dtype}; expected integers"]
    values, counts = _label_counts(array)
    outside = [int(v) for v in values if int(v) not in allowed]
    if outside:
        issues.append(
            f"{case.label}: label values {_listed(outside)} are outside the allowed values {_describe_values(allowed)}"
        )
    if not issues:
        summary.shapes.append(image.shape)
        summary.spacings.append(tuple(float(s) for s in image.spacing))
        for value, count in zip(values.tolist(), counts.tolist()):
            summary.label_voxels[value] = summary.label_voxels.get(value, 0) + count
            summary.cases_with_label[value] = summary.cases_with_label.get(value, 0) + 1
    return issues


def check_cases(cases: Sequence[Case], label_values: Iterable[int], progress: Progress | None = None) -> CaseSummary:
    """Check every case before training; collect all problems of all cases.

    Each case must read as a 3-D volume pair with the same geometry (shape, spacing,
    origin, direction), an integral label, and only values in ``label_values``.
    Cases are read one at a time.

    Returns:
        A :class:`CaseSummary` of the cases (all good).

    Raises:
        CaseError: one line per bad case naming its files and the offending values.
    """
    allowed = {int(v) for v in label_values}
    if not cases:
        raise CaseError("no cases to check; expected at least one image/label pair")
    if progress is not None:
        progress.stage("checking cases", total=len(cases))
    summary = CaseSummary(count=len(cases))
    bad = []
    for done, case in enumerate(cases, start=1):
        issues = _check_case(case, allowed, summary)
        if issues:
            bad.append(f"{case.case_id}: " + "; ".join(issues))
        if progress is not None:
            progress.update(done)
    _raise(f"{len(bad)} of {len(cases)} cases cannot be used for training:", bad)
    summary.missing_labels = sorted(allowed - set(summary.label_voxels))
    return summary
