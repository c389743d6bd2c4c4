"""Is a model's label order right? Anatomy that holds in every abdominal CT, checked on its output.

A checkpoint does not record which organ each output channel is (the FLARE order is even
published two ways), and a wrong order gives a confident segmentation with wrong names. The
rules below hold for any patient lying in a scanner, whatever the image orientation (they
are checked in patient RAS coordinates): the liver lies mostly on the patient's right and is
larger than the spleen, the spleen on the left, kidneys on both sides towards the back,
the pancreas in front of the kidneys between spleen and liver, the stomach left of the
liver and in front of the spleen, and so on for the organs a model has. When rules fail,
every pair of labels named in a failed rule is tried swapped; a pair whose swap makes every
rule hold is reported as "looks swapped".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from repux.bundle.labels import Label
from repux.imageio import Volume

#: HU above which a voxel belongs to the body (not air); its centre is the midline reference.
BODY_HU = -300.0
#: Organs with less than this volume (mL) count as not found in the CT.
MIN_ORGAN_ML = 1.0
KIDNEYS = ("kidney", "right kidney", "left kidney")


@dataclass(frozen=True)
class Place:
    """Where one organ is: voxel count, volume (mL), centroid (RAS mm), share right of the midline."""

    voxels: int
    volume_ml: float
    centroid: np.ndarray
    right_share: float


@dataclass(frozen=True)
class Rule:
    text: str
    organs: tuple[str, ...]
    holds: Callable[[dict[str, Place], np.ndarray], bool]


def _axis_rule(text: str, first: str, second: str, axis: int) -> Rule:
    """``first``'s centroid beyond ``second``'s along RAS ``axis`` (0 right, 1 anterior, 2 superior)."""
    return Rule(text, (first, second), lambda o, b: o[first].centroid[axis] > o[second].centroid[axis])


def _right_of(first: str, second: str, text: str = "") -> Rule:
    return _axis_rule(text or f"{first} is right of the {second}", first, second, 0)


def _in_front_of(first: str, second: str) -> Rule:
    return _axis_rule(f"{first} lies in front of the {second}", first, second, 1)


def _above(first: str, second: str, text: str = "") -> Rule:
    return _axis_rule(text or f"{first} lies above the {second}", first, second, 2)


def _side(organ: str, right: bool, text: str = "") -> Rule:
    """Most of ``organ``'s voxels on the patient's right (or left) of the body's midline."""
    side = "right" if right else "left"
    check = (lambda o, b: o[organ].right_share > 0.5) if right else (lambda o, b: o[organ].right_share < 0.5)
    return Rule(text or f"{organ} lies on the patient's {side}", (organ,), check)


RULES: tuple[Rule, ...] = (
    _side("liver", True, "liver lies mostly on the patient's right"),
    _side("spleen", False),
    _right_of("liver", "spleen"),
    Rule("liver is larger than the spleen", ("liver", "spleen"), lambda o, b: o["liver"].voxels > o["spleen"].voxels),
    Rule("kidneys lie on both sides", ("kidney",), lambda o, b: 0.2 < o["kidney"].right_share < 0.8),
    Rule("kidneys lie in the back half of the body", ("kidney",), lambda o, b: o["kidney"].centroid[1] < b[1]),
    _side("right kidney", True),
    _side("left kidney", False),
    _right_of("right kidney", "left kidney"),
    Rule(
        "right and left kidney lie in the back half",
        ("right kidney", "left kidney"),
        lambda o, b: max(o["right kidney"].centroid[1], o["left kidney"].centroid[1]) < b[1],
    ),
    _in_front_of("pancreas", "kidneys"),
    Rule(
        "pancreas lies between spleen and liver",
        ("pancreas", "spleen", "liver"),
        lambda o, b: o["spleen"].centroid[0] < o["pancreas"].centroid[0] < o["liver"].centroid[0],
    ),
    _right_of("liver", "stomach", "stomach is left of the liver"),
    _in_front_of("stomach", "spleen"),
    _side("gallbladder", True),
    _right_of("inferior vena cava", "aorta"),
    _right_of("right adrenal gland", "left adrenal gland"),
    _above("esophagus", "pancreas"),
    _right_of("duodenum", "pancreas", "duodenum is right of the pancreas' centre"),
    _above("kidneys", "urinary bladder", "urinary bladder lies below the kidneys"),
    _above("kidneys", "prostate/uterus", "prostate/uterus lies below the kidneys"),
)


@dataclass
class LabelCheck:
    """The outcome: each applicable rule with whether it held, missing organs, swaps that fix it."""

    results: list[tuple[str, bool]]
    missing: list[str]
    swaps: list[tuple[Label, Label]] = field(default_factory=list)
    fixed_names: list[str] | None = None

    @property
    def consistent(self) -> bool:
        return all(ok for _, ok in self.results)

    def report(self) -> str:
        lines = [f"  {'ok  ' if ok else 'FAIL'} {text}" for text, ok in self.results]
        if not self.results:
            lines.append("  no rule applies: the model has none of the organs the rules know, or none was found")
        if self.missing:
            lines.append(f"  not found in this CT (rules about them skipped): {', '.join(self.missing)}")
        if self.consistent:
            lines.append("labels are consistent with the anatomy" if self.results else "labels could not be checked")
        elif self.swaps:
            for a, b in self.swaps:
                lines.append(
                    f"labels look swapped: {a.value} {a.name!r} <-> {b.value} {b.name!r} (with them swapped every rule holds)"
                )
        else:
            lines.append("labels are NOT consistent with the anatomy, and no swap of two labels explains it")
        return "\n".join(lines)


def places(labels: Volume, label_list: Sequence[Label], ct: Volume) -> tuple[dict[str, Place], np.ndarray]:
    """Each label's :class:`Place` (by lower-case name, background left out) and the body centre (RAS mm)."""
    body_ijk = np.argwhere(ct.array > BODY_HU)
    if len(body_ijk) == 0:
        body_ijk = np.argwhere(np.ones_like(ct.array, dtype=bool))
    affine = labels.affine
    body_centre = affine[:3, :3] @ body_ijk.mean(axis=0) + affine[:3, 3]
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    found: dict[str, Place] = {}
    for label in label_list:
        if label.value == 0:
            continue
        ijk = np.argwhere(labels.array == label.value)
        if len(ijk) == 0:
            continue
        x = ijk @ affine[0, :3] + affine[0, 3]
        centroid = affine[:3, :3] @ ijk.mean(axis=0) + affine[:3, 3]
        found[label.name.lower()] = Place(len(ijk), len(ijk) * voxel_ml, centroid, float(np.mean(x > body_centre[0])))
    return found, body_centre


def _with_kidneys(organs: dict[str, Place]) -> dict[str, Place]:
    """Add "kidneys": all kidney labels together (for rules about kidneys in general)."""
    kidneys = [organs[name] for name in KIDNEYS if name in organs]
    if not kidneys:
        return organs
    voxels = sum(k.voxels for k in kidneys)
    centroid = sum(k.centroid * k.voxels for k in kidneys) / voxels
    right = sum(k.right_share * k.voxels for k in kidneys) / voxels
    return {**organs, "kidneys": Place(voxels, sum(k.volume_ml for k in kidneys), centroid, right)}


def _evaluate(organs: dict[str, Place], body: np.ndarray) -> list[tuple[Rule, bool]]:
    organs = _with_kidneys(organs)
    return [(rule, bool(rule.holds(organs, body))) for rule in RULES if all(name in organs for name in rule.organs)]


def check_labels(labels: Volume, label_list: Sequence[Label], ct: Volume) -> LabelCheck:
    """Check a segmentation ``labels`` of ``ct`` (same grid) made with ``label_list``.

    A pair of labels is reported as swapped when both take part in a failed rule and
    exchanging their names makes every rule hold (an organ no failed rule mentions is never
    suspected: exchanging it with one that is would often satisfy the rules by accident).
    """
    organs, body = places(labels, label_list, ct)
    organs = {name: place for name, place in organs.items() if place.volume_ml >= MIN_ORGAN_ML}
    known = {name for rule in RULES for name in rule.organs} | set(KIDNEYS)
    missing = [
        label.name
        for label in label_list
        if label.value != 0 and label.name.lower() in known and label.name.lower() not in organs
    ]
    evaluated = _evaluate(organs, body)
    check = LabelCheck([(rule.text, ok) for rule, ok in evaluated], missing)
    if check.consistent:
        return check
    suspects = {name for rule, ok in evaluated if not ok for name in rule.organs}
    if "kidneys" in suspects:
        suspects |= set(KIDNEYS)
    by_name = {label.name.lower(): label for label in label_list}
    for a, b in itertools.combinations(sorted(suspects & set(organs)), 2):
        swapped = dict(organs)
        swapped[a], swapped[b] = organs[b], organs[a]
        if all(ok for _, ok in _evaluate(swapped, body)):
            check.swaps.append((by_name[a], by_name[b]))
    if len(check.swaps) == 1:
        a, b = check.swaps[0]
        rename = {a.name: b.name, b.name: a.name}
        check.fixed_names = [rename.get(label.name, label.name) for label in label_list]
    return check
