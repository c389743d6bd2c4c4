"""Output labels of a model: value, name, colour and the terminology codes Slicer shows for a segment.

A label list is written in JSON (in ``model.json`` and in user label files) as::

    {"labels": [
      {"value": 0, "name": "background", "color": [0, 0, 0]},
      {"value": 1, "name": "liver", "color": [221, 130, 101],
       "terminology": {
         "context": "Segmentation category and type - 3D Slicer General Anatomy list",
         "category": {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"},
         "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
         "modifier": null}}
    ]}

A label file has the key ``labels`` and optionally ``description`` (free text); in
``model.json`` the same list is the value of ``labels``. Per label: ``value`` is the label
value and the network's output channel; the values must be exactly 0, 1, ..., N-1 with 0
the background. ``name`` is the segment name. ``color`` is RGB, integers 0..255.
``terminology`` is optional (without it a segment gets a name and colour only); inside it
``context`` is optional (default: Slicer's General Anatomy list), ``category`` and ``type``
are required and ``modifier`` (left/right) is optional; codes must not contain ``~ ^ |``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repux.bundle.errors import BundleError, JsonFields, is_int
from repux.errors import InputError

#: Context of the organs in Slicer's "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json".
GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
#: Context of the larger DICOM list, for types the General Anatomy list lacks.
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
#: Anatomic region context of a ``TerminologyEntry`` (our segments set no region).
ANATOMIC_REGION_CONTEXT = "Anatomic codes - DICOM master list"

# Characters that separate the parts of a TerminologyEntry ("~", "^") and the tags of a
# .seg.nrrd segment ("|"): inside a code they would corrupt the stored string.
_SEPARATORS = ("~", "^", "|")


@dataclass(frozen=True)
class Code:
    """One coded concept, e.g. ``Code("SCT", "10200004", "Liver")`` (SNOMED CT)."""

    scheme: str
    value: str
    meaning: str

    def triplet(self) -> str:
        """``scheme^value^meaning``, the form a TerminologyEntry stores."""
        return f"{self.scheme}^{self.value}^{self.meaning}"

    def to_json(self) -> dict[str, str]:
        return {"scheme": self.scheme, "value": self.value, "meaning": self.meaning}

    @classmethod
    def from_json(cls, fields: JsonFields) -> "Code":
        fields.only(("scheme", "value", "meaning"))
        parts = [_plain_string(fields, name) for name in ("scheme", "value", "meaning")]
        return cls(*parts)


def _plain_string(fields: JsonFields, name: str) -> str:
    expected = "a non-empty string without " + " ".join(repr(c) for c in _SEPARATORS)
    return fields.get(
        name, expected, lambda v: isinstance(v, str) and v.strip() != "" and not any(c in v for c in _SEPARATORS)
    )


def _code_or_empty(code: Code | None) -> str:
    return code.triplet() if code is not None else "^^"


@dataclass(frozen=True)
class Label:
    """One output channel of a model.

    Attributes:
        value: label value in the label map, equal to the output channel index (0 = background).
        name: segment name shown to the user.
        color: RGB, integers 0..255.
        category, type, modifier: terminology codes (``modifier`` for left/right); None if unset.
        context: the terminology context (list) that ``category``/``type`` come from.
    """

    value: int
    name: str
    color: tuple[int, int, int]
    category: Code | None = None
    type: Code | None = None
    modifier: Code | None = None
    context: str = GENERAL_ANATOMY_CONTEXT

    @property
    def has_terminology(self) -> bool:
        return self.type is not None

    def terminology_entry(self) -> str:
        """Slicer's ``TerminologyEntry`` segment tag: seven ``~``-separated parts.

        Context, category, type, type modifier, anatomic region context, region, region
        modifier; an unset code is ``^^``. Raises ValueError for a label without a type code.
        """
        if self.type is None:
            raise ValueError(f"label {self.value} ({self.name!r}) has no terminology type code")
        parts = [
            self.context,
            _code_or_empty(self.category),
            self.type.triplet(),
            _code_or_empty(self.modifier),
            ANATOMIC_REGION_CONTEXT,
            "^^",
            "^^",
        ]
        return "~".join(parts)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.type is not None:
            data["terminology"] = {
                "context": self.context,
                "category": self.category.to_json() if self.category else None,
                "type": self.type.to_json(),
                "modifier": self.modifier.to_json() if self.modifier else None,
            }
        return data

    @classmethod
    def from_json(cls, fields: JsonFields) -> "Label":
        fields.only(("value", "name", "color", "terminology"))
        value = fields.integer("value", minimum=0)
        name = fields.get(
            "name", "a non-empty name without '|'", lambda v: isinstance(v, str) and v.strip() != "" and "|" not in v
        )
        color = fields.get(
            "color",
            "3 integers 0..255 (RGB)",
            lambda v: isinstance(v, list) and len(v) == 3 and all(is_int(c) and 0 <= c <= 255 for c in v),
        )
        if "terminology" not in fields:
            return cls(value, name, tuple(color))
        term = fields.obj("terminology")
        term.only(("context", "category", "type", "modifier"))
        context = _plain_string(term, "context") if "context" in term else GENERAL_ANATOMY_CONTEXT
        category = Code.from_json(term.obj("category"))
        type_ = Code.from_json(term.obj("type"))
        modifier = None
        if term.data.get("modifier") is not None:
            modifier = Code.from_json(term.obj("modifier"))
        return cls(value, name, tuple(color), category, type_, modifier, context)


def labels_to_json(labels: list[Label]) -> list[dict[str, Any]]:
    return [label.to_json() for label in labels]


def labels_from_list(items: Any, source: str, key: str = "labels") -> list[Label]:
    """Parse and check a JSON label list (see the module docstring); errors name ``source`` and ``key``."""
    if not isinstance(items, list):
        raise BundleError(f"{source}: key '{key}': expected a JSON array of labels, got {type(items).__name__}")
    labels = [Label.from_json(JsonFields(item, source, f"{key}[{i}]")) for i, item in enumerate(items)]
    check_label_values(labels, source, key)
    return labels


def check_label_values(labels: list[Label], source: str, key: str = "labels", out_chans: int | None = None) -> None:
    """Refuse label lists whose values are not exactly 0..N-1 or whose names repeat.

    With ``out_chans``, N must also equal the network's number of output channels.
    """
    values = sorted(label.value for label in labels)
    expected_count = len(labels) if out_chans is None else out_chans
    if len(labels) < 2 or values != list(range(expected_count)):
        expected = f"label values exactly 0..{expected_count - 1} (0 = background"
        expected += ")" if out_chans is None else f", one per output channel of the network: {out_chans})"
        raise BundleError(f"{source}: key '{key}': expected {expected}, got values {values}")
    names = [label.name for label in labels]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BundleError(f"{source}: key '{key}': expected distinct label names, got {repeated} more than once")


def labels_from_json(path: str | os.PathLike) -> list[Label]:
    """Read a user label file: a JSON object ``{"labels": [...]}`` (format in the module docstring).

    Raises:
        BundleError: unreadable JSON or any label that does not follow the format.
    """
    path = Path(path)
    data = read_json_file(path)
    fields = JsonFields(data, str(path))
    fields.only(("labels", "description"))
    return labels_from_list(fields.get("labels", "a JSON array of labels"), str(path))


def read_json_file(path: Path) -> Any:
    """Parse a JSON file; missing file, bad UTF-8, bad syntax and NaN/Infinity become ``BundleError``."""
    if not path.is_file():
        raise BundleError(f"{path}: file not found (expected a JSON file)")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as error:
        raise BundleError(f"{path}: not UTF-8 text (expected a JSON file): {error}") from None
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except InputError as error:
        raise BundleError(f"{path}: {error}") from None


def _refuse_constant(name: str) -> Any:
    raise InputError(f"{name} is not a valid JSON number (expected finite numbers only)")
